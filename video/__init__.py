"""Video decoding, frame sampling, clip transforms, datasets, classification pipeline. Never imports ernie_vl."""
