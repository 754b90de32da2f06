"""Word-level tokenizers built offline with the `tokenizers` library.

Random-initialised test models and the embedded demo model need a real tokenizer without any
download; a word-level vocabulary is enough for them and keeps each answer word one token.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"

# Words every offline tokenizer knows, so prompts typed by hand mostly avoid <unk>.
COMMON_WORDS = """
a an the is are was were be been this that these those it its there here what which who whom whose
where when why how many much some any all each every no not yes and or but of in on at to from by with
for about into over under above below between left right top bottom middle center centre front back
image picture photo scene describe color colour shape object objects thing things one two three four
five six seven eight nine ten red green blue yellow white black grey gray orange purple pink brown
circle square triangle rectangle star big small large tiny do does did can could you your me my i
please tell show see look find count name give answer question word words text
""".split()
PUNCTUATION = list(".,?!:;'\"()-")


def build_word_tokenizer(
    words: list[str],
    extra_special_tokens: list[str],
    chat_template: str,
    model_max_length: int = 2048,
    **named_tokens: str,
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer whose vocabulary is the special tokens, `words` and punctuation.
    `named_tokens` (e.g. boi_token="<start_of_image>") become tokenizer attributes, as processors expect."""
    vocab: dict[str, int] = {}
    for token in [PAD, UNK, BOS, EOS, *extra_special_tokens, *PUNCTUATION, *words]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=model_max_length,
        chat_template=chat_template,
        **named_tokens,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": extra_special_tokens}, replace_extra_special_tokens=False
    )
    return tokenizer
