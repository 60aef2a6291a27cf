"""Training: data (pairing, tiles, sampling), targets, augmentation, losses, the LightningModule and callbacks."""
