"""AlexNet as in the paper, and the machinery that train.py and evaluate.py share."""
