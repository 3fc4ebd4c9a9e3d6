"""Files in and out: checkpoints, configs, atomic writes and hashes, images and their PNG parameters."""
