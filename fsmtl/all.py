"The notebook surface: `from fsmtl.all import *`."
from fastai.vision.all import *
from .data import *
