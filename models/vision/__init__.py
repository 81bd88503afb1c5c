"""What vision models share: the image pipeline (image.py) and encoder towers (siglip.py)."""
