"""The networks: the frozen backbones, the text encoder, and the two trainable heads."""
