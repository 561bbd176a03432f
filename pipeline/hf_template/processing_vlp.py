"""The processor of a vlp export: captions and pictures in, the model's inputs out (written by
`vlp export --format hf`; loaded with trust_remote_code=True).

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(text=captions, images=pictures, return_tensors="pt", padding=True)
    model(**inputs).logits_per_image

The tokenizer and the image processor are the folder's own (tokenizer.json, preprocessor_config.json);
this class only puts them behind one call, as CLIP's processor does.
"""
from transformers import ProcessorMixin


class VlpMultiwayProcessor(ProcessorMixin):
    # The model has max_text_len text positions (the tokenizer's model_max_length): a longer caption is
    # cut to them unless the caller passes truncation=False, instead of failing in the model.
    text_kwargs = {"truncation": True}

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)
