"""Notebook displays: short reprs, self-contained HTML that parses and escapes its text, PNG figures of maps."""

import base64
import dataclasses
import io
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import lvlm_interpret
from lvlm_interpret import GenerationOptions, UserInputError, generate_with_capture, get_method, show
from lvlm_interpret.analysis.ablation import AblationResult
from lvlm_interpret.analysis.knockout import KnockoutResult, WindowResult
from lvlm_interpret.analysis.logit_lens import LogitLens
from lvlm_interpret.client import RemoteTrace
from lvlm_interpret.methods.visual_relevance import VisualRelevance
from lvlm_interpret.rendering import colour_lookup

VOID_TAGS = {"img", "br", "hr", "meta", "input", "link", "col", "area", "base", "wbr", "source"}
PNG_URI = "data:image/png;base64,"


class Markup(HTMLParser):
    """Checks that every tag is closed in order and no script, style sheet or remote resource is used."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open_tags, self.images, self.texts = [], [], []

    def handle_starttag(self, tag, attrs):
        assert tag not in ("script", "link", "iframe"), f"<{tag}> in the notebook HTML"
        assert not any(name.startswith("on") for name, _ in attrs), f"event handler on <{tag}>"
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in VOID_TAGS:
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        assert self.open_tags and self.open_tags[-1] == tag, f"</{tag}> closes {self.open_tags[-1:]}"
        self.open_tags.pop()

    def handle_data(self, data):
        self.texts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def parse(markup: str) -> Markup:
    parsed = Markup()
    parsed.feed(markup)
    parsed.close()
    assert not parsed.open_tags, f"unclosed tags {parsed.open_tags}"
    for image in parsed.images:  # inline pictures only, each a PNG that decodes
        assert image["src"].startswith(PNG_URI)
        Image.open(io.BytesIO(base64.b64decode(image["src"][len(PNG_URI):]))).load()
    return parsed


@pytest.fixture(scope="module")
def hostile_trace(llava, scene):
    return generate_with_capture(llava, [scene], "Describe <script>alert('x')</script> & the <i>shape</i>.",
                                 GenerationOptions(max_new_tokens=4))


def remote_of(trace) -> RemoteTrace:
    return RemoteTrace(request_id="r1", model_name=trace.model_name, prompt=trace.prompt, answer=trace.answer,
                       answer_texts=trace.answer_texts, answer_ids=trace.answer_ids, images=trace.images,
                       n_layers=trace.n_layers, n_heads=trace.n_heads,
                       answer_logprobs=trace.answer_logprobs.tolist(), token_texts=trace.token_texts,
                       prompt_length=trace.prompt_length)


def analysis_results():
    windows = [WindowResult("early", [0], 0.2, True), WindowResult("late", [1, 2], 0.05, False)]
    return [
        AblationResult(positions=list(range(576)), replacement="mean", token_index=1, target="<b>", prob_before=0.4,
                       prob_after=0.1, still_argmax=False, answer_before="a <b> square", answer_after="a circle"),
        KnockoutResult(token_index=1, target="<b>", queries=[700], keys=list(range(5, 581)), prob_before=0.4,
                       windows=windows),
        LogitLens(layers=[0, 1, 2], rows=4, cols=4, token_ids=np.zeros((3, 16, 2), dtype=np.int64),
                  probs=np.random.default_rng(0).random((3, 16, 2), dtype=np.float32),
                  texts=[[["</s>" if cell % 2 else "", "red"] for cell in range(16)] for _ in range(3)]),
        VisualRelevance(llr=[0.1, 2.5, -0.3], logprob_image=[-1.0, -0.2, -3.0], logprob_blurred=[-1.1, -2.7, -2.7],
                        relevant=[False, True, False]),
    ]


def assert_short(text: str):
    assert "tensor(" not in text and "array(" not in text and len(text) < 300, text


def test_reprs_are_short_and_say_what_the_result_holds(llava, llava_trace):
    trace_text = repr(llava_trace)
    assert_short(trace_text)
    assert trace_text.startswith("Trace(model='random:llava'")
    assert repr(llava_trace.answer) in trace_text or "..." in trace_text
    assert f"{llava_trace.n_answer} answer tokens, 1 image 8x8 cells, 3 layers x 4 heads" in trace_text

    remote_text = repr(remote_of(llava_trace))
    assert_short(remote_text)
    assert remote_text.startswith("RemoteTrace(request_id='r1'") and "1 image 8x8 cells" in remote_text

    tam = get_method("tam").explain(llava_trace, 1, model=llava)
    tam_text = repr(tam)
    assert_short(tam_text)
    assert "method='tam', token 1" in tam_text and "tam_raw [8x8]" in tam_text and "denoise=True" in tam_text

    for result in analysis_results():
        assert_short(repr(result))
    ablation, knockout, lens, relevance = (repr(result) for result in analysis_results())
    assert "mean ablation of 576 image tokens" in ablation and "p 0.4 -> 0.1" in ablation
    assert "576 keys blocked" in knockout and "early 50%" in knockout and "late 88%" in knockout
    assert lens == "LogitLens(layers 0-2, 4x4 cells, top-2)"
    assert relevance.startswith("VisualRelevance(1 of 3 answer tokens visually relevant")


def test_trace_html_shows_the_image_prompt_and_answer_tokens_escaped(hostile_trace):
    markup = hostile_trace._repr_html_()
    parsed = parse(markup)
    assert len(parsed.images) == 1  # the image, inline
    assert "<script>alert('x')</script> & the <i>shape</i>" in parsed.text  # shown as text...
    assert "<script" not in markup and "<i>shape" not in markup  # ...never as markup
    for word in hostile_trace.answer_texts:
        assert word.strip() in parsed.text
    assert "3 x 4" in parsed.text and "grid 8x8" in parsed.text

    remote = parse(remote_of(hostile_trace)._repr_html_())
    assert remote.images == [] and "r1" in remote.text  # a remote trace has no pixels to show
    assert all(word.strip() in remote.text for word in hostile_trace.answer_texts)


def test_explanation_html_shows_every_map_with_its_colour_scale(llava, llava_trace):
    tam = get_method("tam").explain(llava_trace, 2, model=llava)
    parsed = parse(tam._repr_html_())
    assert len(parsed.images) == 2 * len(tam.all_maps())  # a heatmap and its colour bar per map
    heatmaps = [image for image in parsed.images if image["alt"].startswith("tam")]
    assert [image["alt"] for image in heatmaps] == [f"{name}, 8x8 cells" for name in tam.all_maps()]
    assert f"max {float(tam.maps[0].max()):.4g}" == heatmaps[0]["title"]


def test_show_draws_the_map_on_the_image_with_a_colour_bar(llava_trace, scene):
    view = show(llava_trace, token_index=1)
    picture = Image.open(io.BytesIO(view._repr_png_()))
    picture.load()
    assert picture.width == 448  # a 160-pixel image is enlarged to a legible width
    pixels = np.asarray(picture.convert("RGB"))
    image_height = round(448 * scene.height / scene.width)
    blank_rows = np.flatnonzero((pixels == 255).all(axis=(1, 2)))
    assert blank_rows[0] == image_height  # the image at its aspect ratio, then the colour bar and caption
    lookup = colour_lookup()
    below = pixels[image_height:].reshape(-1, 3)
    for end in (lookup[0], lookup[-1]):  # the colour bar runs from the lowest to the highest colour
        assert (np.abs(below.astype(int) - end).max(axis=1) <= 2).any()

    word = llava_trace.answer_texts[1].strip()
    assert word in view.caption() and "Attention" in view.caption()
    html_view = parse(view._repr_html_())
    assert len(html_view.images) == 1 and word in html_view.images[0]["alt"]


def test_show_and_explanation_show_refuse_what_they_cannot_draw(llava_trace):
    assert show(llava_trace) is llava_trace  # nothing to explain: the trace's own display
    explanation = get_method("attention").explain(llava_trace, 0, layers="1", heads="2")
    assert "layer 1" in explanation.show(llava_trace).caption() and "head 2" in show(llava_trace, explanation).caption()
    with pytest.raises(UserInputError, match="for answer token 0, not 1"):
        show(llava_trace, explanation, token_index=1)
    with pytest.raises(UserInputError, match="no map 'tam_raw'; its maps are attention"):
        explanation.show(llava_trace, "tam_raw")
    with pytest.raises(UserInputError, match="RemoteTrace carries no pixels"):
        explanation.show(remote_of(llava_trace))
    small = dataclasses.replace(explanation, maps=[np.zeros((2, 2), dtype=np.float32)])
    with pytest.raises(UserInputError, match="grid 2x2 is not the trace's 8x8"):
        small.show(llava_trace)


def test_analysis_results_render_their_figures_as_tables():
    ablation, knockout, lens, relevance = analysis_results()
    ablation_view = parse(ablation._repr_html_())
    assert "a <b> square" in ablation_view.text and "-75.0%" in ablation_view.text and "576" in ablation_view.text
    knockout_view = parse(knockout._repr_html_())
    assert "<b>" in knockout_view.text and "1-2" in knockout_view.text and "+87.5%" in knockout_view.text
    lens_view = parse(lens._repr_html_())
    assert len(lens_view.images) == len(lens.layers) + 1  # a top-1 map per layer and the colour scale
    assert "''" in lens_view.text and "</s>" in lens_view.text  # a blank token is shown quoted, not as nothing
    relevance_view = parse(relevance._repr_html_())
    assert relevance_view.text.count("yes") == 1 and "2.500" in relevance_view.text


def test_show_is_exported():
    assert lvlm_interpret.show is show and "show" in lvlm_interpret.__all__
