"""harness: does this cleaned Vision Transformer give better dense features?

Zero-shot open-vocabulary segmentation, linear-probe segmentation and NYUv2 depth under named,
versioned protocols, for any backbone and any artifact-cleaning method.
"""
__version__ = "0.1.0"
