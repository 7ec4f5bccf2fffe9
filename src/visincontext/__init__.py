"""visincontext: VisInContext (rendered in-context text read through a vision encoder) for transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_visincontext import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, VisInContextConfig
from .modeling_visincontext import (
    VisInContextForConditionalGeneration,
    VisInContextModel,
    VisInContextPreTrainedModel,
)
from .processing_visincontext import VisInContextProcessor
from .rendering_visincontext import RenderedText, TextRenderer

__version__ = "0.2.0"

AutoConfig.register(VisInContextConfig.model_type, VisInContextConfig, exist_ok=True)
AutoModel.register(VisInContextConfig, VisInContextModel, exist_ok=True)
AutoModelForImageTextToText.register(VisInContextConfig, VisInContextForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VisInContextConfig, VisInContextProcessor, exist_ok=True)
# save_pretrained copies the remote-code files next to the weights (flat, relative imports only)
VisInContextConfig.register_for_auto_class()
VisInContextModel.register_for_auto_class("AutoModel")
VisInContextForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
VisInContextProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "IMAGE_TOKEN",
    "END_OF_CHUNK_TOKEN",
    "VisInContextConfig",
    "VisInContextPreTrainedModel",
    "VisInContextModel",
    "VisInContextForConditionalGeneration",
    "VisInContextProcessor",
    "TextRenderer",
    "RenderedText",
]
