"""effdet_torch: a PyTorch EfficientDet equal to the official TensorFlow EfficientDet."""
from .config import VARIANTS, EfficientDetConfig, get_config
from .detector import Detector
from .model import EfficientDet, create_model, load_checkpoint

__all__ = ["VARIANTS", "Detector", "EfficientDet", "EfficientDetConfig", "create_model", "get_config",
           "load_checkpoint"]
__version__ = "0.1.0"
