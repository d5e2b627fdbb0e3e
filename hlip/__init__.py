"""hlip: hierarchical language-image pre-training for 3D medical imaging."""

__version__ = "0.1.0"
