"""Image, video and text encoders, and weight import from open_clip / timm / Hugging Face."""
