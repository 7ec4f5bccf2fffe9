"""transformers' ModelTesterMixin (from the installed version's sdist) run against VisInContext."""

import unittest

import torch
from hf_common import ensure_common_tests
from tiny import IMAGE_SIZE, VOCAB, tiny_config
from transformers.models.auto import modeling_auto

from visincontext import VisInContextConfig, VisInContextForConditionalGeneration, VisInContextModel

ensure_common_tests()
from hf_common_tests.test_configuration_common import ConfigTester  # noqa: E402
from hf_common_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402

# The suite finds the base model and the head by name in transformers' static mappings.
modeling_auto.MODEL_MAPPING_NAMES["visincontext"] = "VisInContextModel"
modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES["visincontext"] = "VisInContextForConditionalGeneration"


class VisInContextModelTester:
    def __init__(self, parent, batch_size=2, seq_length=9, num_images=1, num_pages=2):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.num_images = num_images
        self.num_pages = num_pages
        self.is_training = True
        self.num_hidden_layers = 2
        self.hidden_size = 32
        self.num_attention_heads = 4
        self.vocab_size = VOCAB + 2

    def get_config(self) -> VisInContextConfig:
        return tiny_config(freeze_vision_tower=False, freeze_language_model=False)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], VOCAB - 3)
        # Rendered context pages need no placeholder token, so the suite's input-extending tests (which
        # pad `input_ids` with random ids) stay valid; images + <image> tokens are covered in test_modeling.py.
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "context_pixel_values": floats_tensor([self.batch_size, self.num_pages, 3, IMAGE_SIZE, IMAGE_SIZE]),
        }
        return config, inputs

    def prepare_image_features_inputs(self):
        return {"pixel_values": floats_tensor([self.batch_size * self.num_images, 3, IMAGE_SIZE, IMAGE_SIZE])}


class VisInContextModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (VisInContextModel, VisInContextForConditionalGeneration)
    additional_model_inputs = ["context_pixel_values"]
    all_generative_model_classes = ()  # the sdist ships no GenerationTesterMixin; generate has its own tests
    _is_composite = True
    # CLIP's post_layernorm is not used (the resamplers read the last hidden state), so it gets no gradient
    test_all_params_have_gradient = False

    def setUp(self):
        self.model_tester = VisInContextModelTester(self)
        self.config_tester = ConfigTester(self, config_class=VisInContextConfig, has_text_modality=False)

    def _image_features_prepare_config_and_inputs(self):
        # get_image_features takes a flat stack of images: (images, 3, H, W)
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        return config, self.model_tester.prepare_image_features_inputs()

    def test_config(self):
        self.config_tester.run_common_tests()
