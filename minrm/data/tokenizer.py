"""The tokenizer, its chat template and its pad token: what turns conversations into ids.

The template is the tokenizer's own (the reference's default) unless --chat_template_name names one of
config.CHAT_TEMPLATES or a tokenizer to borrow it from; a tokenizer with none is refused only where a dataset
needs one (`mixer.check_columns`). A tokenizer without a pad token, or whose pad is its eos, gets a `<pad>`
(the model's embeddings are resized for it, model/reward.py).
"""

import re

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from minrm.config import CHAT_TEMPLATES, TOY, load_or_exit
from minrm.data.toy import toy_tokenizer


def load_tokenizer(args) -> PreTrainedTokenizerBase:
    """The tokenizer with its chat template and a pad token distinct from eos."""
    if args.model_name_or_path == TOY and args.tokenizer_name_or_path in (None, TOY):
        tokenizer = toy_tokenizer()
    else:
        flag = "tokenizer_name_or_path" if args.tokenizer_name_or_path else "model_name_or_path"
        tokenizer = load_or_exit(AutoTokenizer.from_pretrained, flag, getattr(args, flag), "has no tokenizer that loads",
                                 revision=args.tokenizer_revision or args.model_revision,
                                 trust_remote_code=args.trust_remote_code, use_fast=not args.use_slow_tokenizer)  # fmt: skip
    if (template := args.chat_template_name) in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[template]
    elif template is not None:  # the name of a tokenizer whose own template we borrow
        what = f"is neither a template minrm knows ({', '.join(CHAT_TEMPLATES)}) nor a tokenizer that loads"
        lender = load_or_exit(AutoTokenizer.from_pretrained, "chat_template_name", template, what)
        if lender.chat_template is None:
            raise SystemExit(f"minrm: error: --chat_template_name {template}: that tokenizer has no chat template to borrow")
        tokenizer.chat_template = lender.chat_template
    if args.add_bos:
        template, bos = tokenizer.chat_template or "", tokenizer.bos_token
        if re.match(r"\{\{-?\s*bos_token", template) or (bos and template.startswith(bos)):
            raise SystemExit("minrm: error: --add_bos: the chat template already begins with the bos token; leave --add_bos out")
        tokenizer.chat_template = "{{ bos_token }}" + template
    # Padding with eos would make a real eos look like padding, and vice versa.
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer
