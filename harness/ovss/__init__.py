"""Zero-shot open-vocabulary segmentation: sliding-window inference and post-processing."""
