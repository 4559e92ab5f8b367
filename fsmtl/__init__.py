"Multi-task learning for few-shot image classification."
import warnings

# fastai scripts a few helpers with torch.jit at import, which torch now flags on every start; nothing to act on
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
