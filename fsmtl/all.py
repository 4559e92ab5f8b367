from fastai.vision.all import *
from .data import *
from .probe import *
from .features import *
from .evaluate import *
from .callbacks import *
from .classifier import *
