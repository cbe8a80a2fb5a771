"""Models: the classifiers under attack and the conditioned generators that invert them."""

from tldr_fast.models.classifiers import MLP, ImageClassifier, Normalize, PaperCNN
from tldr_fast.models.generator import Generator
from tldr_fast.models.lenet import LeNet
from tldr_fast.models.resnet import ResNet18
from tldr_fast.models.vit import ViT

__all__ = [
    "MLP",
    "Generator",
    "ImageClassifier",
    "LeNet",
    "Normalize",
    "PaperCNN",
    "ResNet18",
    "ViT",
]
