"""Code shared by the PyTorch peers in bench/peers/ (a subfolder: the device runner runs every bench/peers/*.py)."""
