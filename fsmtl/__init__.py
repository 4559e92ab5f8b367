"""Multi-task learning for few-shot image classification.

fsmtl follows the code of Wang, Zhao & Li, "Bridging Multi-Task Learning and Meta-Learning" (ICML 2021),
https://github.com/AI-secure/multi-task-learning, called "the original code" in the docs.
"""
import warnings

# fastai scripts a few helpers with torch.jit at import, which torch now flags on every start; nothing to act on
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
