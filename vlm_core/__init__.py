"""vlm_core: the Prefect-free library for fine-tuning InternVL-style models."""
