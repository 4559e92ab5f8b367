"Benchmarks, downloads, task sampling and augmentation for few-shot learning."
from .core import *
from .download import *
from .images import *
from .benchmarks import *
from .transforms import *
from .tasks import *
from .block import *
from .torchvision_domains import *
