"""AlexNet as in the paper, and the machinery that train.py and evaluate.py share."""
import preprocess  # noqa: F401 (checks that 'datasets' is this project's, not Hugging Face's namesake)
from alexnet.model import AlexNet

__all__ = ["AlexNet"]
