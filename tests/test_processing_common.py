"""transformers' ProcessorTesterMixin (from the installed version's sdist) run against VisInContextProcessor."""

import unittest

from hf_common import ensure_common_tests
from tiny import tiny_processor, tiny_tokenizer

from visincontext import VisInContextProcessor

ensure_common_tests()
from hf_common_tests.test_processing_common import ProcessorTesterMixin  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class VisInContextProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = VisInContextProcessor

    @classmethod
    def _setup_tokenizer(cls):
        return tiny_tokenizer()  # byte-level: lossless, as the offset tests need

    @classmethod
    def _setup_image_processor(cls):
        return tiny_processor(image_size=32).image_processor

    @staticmethod
    def prepare_processor_dict():
        return {"line_height": 8, "max_pages": 4, "chat_template": CHAT_TEMPLATE}
