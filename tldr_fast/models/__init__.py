"""Models: the classifiers under attack and the conditioned generators that invert them."""

from tldr_fast.models.classifiers import MLP, ImageClassifier, Normalize, PaperCNN

__all__ = ["MLP", "ImageClassifier", "Normalize", "PaperCNN"]
