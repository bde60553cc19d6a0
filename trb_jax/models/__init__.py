"""Model definitions (Qwen3) and their Hugging Face checkpoint mapping."""
