"""Files in and out: loading models and checkpoints (`checkpoint`), safetensors files (`files`), the built-in
real assets (`assets`), and the one module that edits a Hugging Face config (`config_edit`)."""
