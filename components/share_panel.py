"""Share: a link that reopens the page at the same request, word, tab and method, for a colleague or later.

The link carries an opaque id made by the backend (`ExplainBackend.share`: never the image or the prompt, which stay
with the backend) and the view as query parameters: `?share=ID&token=3&tab=methods&method=tam&map=tam&layer=all&
head=all&aggregation=mean` (no `token` until a word is picked). The page reads them when it loads (`read_url`), and `open_link` brings the request back
from the backend (from its cache, or regenerated if it was evicted); an unknown or expired link is one message.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlencode

import gradio as gr
from gradio.processing_utils import save_pil_to_cache

from lvlm_interpret import ExplainBackend, TraceView, UserInputError

from .attention_panel import ALL
from .method_panel import method_names

# the tabs a link may name (their ids in the page), in the page's order
TABS = ("attention", "linked", "methods", "gallery", "analyses", "trust", "compare", "features")
VIEW = ("token", "tab", "method", "map", "layer", "head", "aggregation")  # the query parameters besides `share`
AGGREGATIONS = ("mean", "max")
LABEL = "Link to this view (the request, the word, the tab and the method; not the image or prompt)"
# turns the query the server makes into a link on the address the browser sees (behind a proxy too)
ABSOLUTE_LINK_JS = "(query) => query && query.startsWith('?') ? window.location.origin + window.location.pathname " \
                   "+ query : query"


@dataclass
class SharePanel:
    button: gr.Button
    link: gr.Textbox
    made: gr.State  # the last link made: {"request_id", "share_id", "expires_at"}, reused for the same request
    tab: gr.State  # the open tab's name
    asked: gr.State  # the view a link asks for, read from the page's address when it loads

    @classmethod
    def build(cls) -> "SharePanel":
        with gr.Row():
            button = gr.Button("Share", elem_id="share", scale=0, min_width=90, size="md")
            link = gr.Textbox(label=LABEL, buttons=["copy"], interactive=False, elem_id="share-link", scale=5,
                              placeholder="Generate an answer, pick a word, then press Share")
        return cls(button, link, gr.State({}), gr.State(TABS[0]), gr.State(None))

    def wire(self, demo: gr.Blocks, service: ExplainBackend, session: gr.State, tabs: gr.Tabs, named: dict,
             view_inputs: list, on_open, open_outputs: list, concurrency_id: str | None = None):
        """Follow the open tab (`named`: {name in TABS: its gr.Tab}), make links from the session and the view
        (`view_inputs`: method, map, layer, head, aggregation), and open the link the page was loaded with through
        `on_open(asked)` into `open_outputs`; returns that event (a generation's follow-ups hang on it)."""
        for name, tab in named.items():
            tab.id = name  # what gr.Tabs(selected=...) names
            tab.select(_returns(name), None, self.tab)
        @_user_errors
        def on_share_clicked(*view):
            return on_share(service, *view)

        made = self.button.click(on_share_clicked, [session, self.made, self.tab, *view_inputs], [self.made, self.link])
        made.success(None, self.link, self.link, js=ABSOLUTE_LINK_JS)
        demo.load(read_url, None, self.asked)
        # a State's change event runs only when the value changed: a page loaded without a link opens nothing
        return self.asked.change(on_open, self.asked, [*open_outputs, tabs, self.tab], concurrency_id=concurrency_id)


def _returns(value):
    return lambda: value


def _user_errors(handler, **notice):
    @functools.wraps(handler)  # keeps the signature: Gradio injects gr.Request by it
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except UserInputError as error:
            raise gr.Error(str(error), **notice) from None
    return wrapped


def opening_errors(handler):
    """Why a link cannot be opened, as one message that stays until closed (the page was opened for that link)."""
    return _user_errors(handler, duration=None, title="This link cannot be opened")


def read_url(request: gr.Request) -> dict | None:
    """The view the page's address asks for ({"share": id, and VIEW's parameters as given}), None without a link."""
    query = dict(request.query_params) if request is not None else {}
    if "share" not in query:
        return None
    return {name: query.get(name) for name in ("share", *VIEW)}


def link_query(share_id: str, token: int | None, tab: str, method: str, map_name: str | None, layer: str, head: str,
               aggregation: str) -> str:
    """`token` None: no word was picked (the methods with an answer-level map show it)."""
    view = {"token": token, "tab": tab, "method": method, "map": map_name or method, "layer": layer, "head": head,
            "aggregation": aggregation}
    return "?" + urlencode({"share": share_id, **{name: value for name, value in view.items() if value is not None}})


def on_share(service: ExplainBackend, state: dict, made: dict, tab: str, method: str, map_name: str | None,
             layer: str, head: str, aggregation: str) -> tuple[dict, dict]:
    """A link to what the page shows: one share id per request, the view in the query."""
    if not state:
        raise UserInputError("generate an answer first, then share it")
    if made.get("request_id") != state["request_id"]:
        link = service.share(state["request_id"])
        made = {"request_id": state["request_id"], "share_id": link.share_id, "expires_at": link.expires_at}
    label = LABEL if made["expires_at"] is None else f"{LABEL}; valid until {_date(made['expires_at'])}"
    query = link_query(made["share_id"], state["token"] if state.get("picked") else None, tab, method, map_name,
                       layer or ALL, head or ALL, aggregation or "mean")
    return made, gr.update(value=query, label=label)


def _date(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class OpenedView:
    """A link opened: the session's state and what the page's controls show."""
    state: dict
    trace: TraceView
    image_file: str  # the request's image as a PNG in Gradio's cache (exact pixels: the input's own format is lossy)
    prompt: str
    model: str
    max_new_tokens: int
    temperature: float
    top_p: float
    tab: str
    method: str
    map_name: str
    layer: str
    head: str
    aggregation: str

    def inputs(self) -> tuple:
        """The generation panel's values (image, prompt, model, max new tokens, temperature, top-p)."""
        return self.image_file, self.prompt, self.model, self.max_new_tokens, self.temperature, self.top_p

    def attention_choices(self) -> tuple[gr.Dropdown, gr.Dropdown]:
        return (gr.Dropdown(choices=[ALL, *map(str, range(self.trace.n_layers))], value=self.layer),
                gr.Dropdown(choices=[ALL, *map(str, range(self.trace.n_heads))], value=self.head))


def open_link(service: ExplainBackend, asked: dict, cache_dir: str) -> OpenedView:
    """The request and view a link names; UserInputError (one line) for an unknown or expired link, or a view
    outside the request (an edited link)."""
    shared = service.open_shared(asked.get("share") or "")
    trace = shared.trace
    picked = asked.get("token") is not None
    token = _choice(asked.get("token") or "0", [str(k) for k in range(trace.n_answer)], "word (token)")
    tab = _choice(asked.get("tab") or TABS[0], TABS, "tab")
    method = _choice(asked.get("method") or method_names()[0], method_names(), "method")
    layer = _choice(asked.get("layer") or ALL, [ALL, *map(str, range(trace.n_layers))], "layer")
    head = _choice(asked.get("head") or ALL, [ALL, *map(str, range(trace.n_heads))], "head")
    aggregation = _choice(asked.get("aggregation") or "mean", AGGREGATIONS, "aggregation")
    options = shared.options
    image = shared.images[0]
    return OpenedView(
        state={"request_id": shared.request_id, "image": image, "token": int(token), **({"picked": True} if picked
                                                                                      else {})}, trace=trace,
        image_file=save_pil_to_cache(image, cache_dir, format="png"), prompt=trace.prompt, model=trace.model_name,
        max_new_tokens=options.max_new_tokens, temperature=options.temperature if options.do_sample else 0,
        top_p=options.top_p, tab=tab, method=method, map_name=asked.get("map") or method,
        layer=layer, head=head, aggregation=aggregation)


def _choice(value: str, allowed, name: str) -> str:
    if value not in allowed:
        shown = f"0 to {len(allowed) - 1}" if name.startswith("word") else ", ".join(allowed)
        # the notice renders HTML: a value from the address is shown as text
        raise UserInputError(f"this link names {name} {html.escape(repr(value[:40]), quote=False)}, which this "
                             f"request does not have ({shown}): the link was cut or edited; ask for it again")
    return value
