"""Test-only ms-swift plugin: the Qwen3-VL template with the tiny tokenizer's image/video token ids.

ms-swift's Qwen-VL templates hard-code Qwen's vocabulary ids (``image_token_id = 151655``); the tiny
checkpoint's tokenizer has 640 tokens, so this registers ``hsm_tiny_qwen3_vl`` reading the ids from the
tokenizer. Real Qwen checkpoints use ms-swift's own ``qwen3_vl`` template unchanged.
"""

from swift.template import register_template
from swift.template.templates.qwen import Qwen3VLTemplate, QwenTemplateMeta


class TinyQwen3VLTemplate(Qwen3VLTemplate):
    def init_processor(self, processor) -> None:
        super().init_processor(processor)
        if processor is not None:
            tokenizer = processor.tokenizer
            self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
            self.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")


register_template(QwenTemplateMeta("hsm_tiny_qwen3_vl", template_cls=TinyQwen3VLTemplate, default_system=None),
                  exist_ok=True)
