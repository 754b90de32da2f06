"""Generation panel: image, prompt, generation options and the button that runs a request."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from lvlm_interpret import ExplainService, GenerationOptions, UserInputError
from lvlm_interpret.images import prepare_image


@dataclass
class GenerationPanel:
    image: gr.Image
    prompt: gr.Textbox
    max_new_tokens: gr.Slider
    button: gr.Button

    @classmethod
    def build(cls) -> "GenerationPanel":
        with gr.Column():
            image = gr.Image(type="pil", label="Image", image_mode=None, height=320, elem_id="input-image")
            prompt = gr.Textbox(label="Prompt", value="Describe the image.", lines=1, elem_id="prompt")
            max_new_tokens = gr.Slider(1, 128, value=32, step=1, label="Max new tokens")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        return cls(image, prompt, max_new_tokens, button)


def run_generation(service: ExplainService, image, prompt: str, max_new_tokens: int) -> tuple[str, object]:
    """Generate for one uploaded image; returns the request id and its Trace. Raises UserInputError."""
    if image is None:
        raise UserInputError("upload an image first")
    options = GenerationOptions(max_new_tokens=int(max_new_tokens))
    return service.generate([prepare_image(image)], prompt, options=options)
