"""AlexNet as in the paper, and the machinery that train.py and evaluate.py share."""
from alexnet.model import AlexNet

__all__ = ["AlexNet"]
