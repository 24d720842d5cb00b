"""Texts the tokenizer tests run over: the scripts, spacing and symbols that tokenizers get wrong."""

BATTERY = {
    "empty": "",
    "ascii_prose": "The quick brown fox jumps over the lazy dog. It's 5 o'clock somewhere!",
    "contractions": "I'm sure you'll see they're right, we've said it's what I'd do. DON'T SHOUT'LL",
    "chinese": "你好，世界！今天天气很好，我们去公园散步吧。",
    "japanese_korean": "こんにちは世界 안녕하세요 세계",
    "emoji": "Launch 🚀 party 🎉🎉 thumbs 👍🏽",
    "emoji_zwj": "Family: 👨‍👩‍👧‍👦, flag: 🏳️‍🌈, astronaut 🧑‍🚀",
    "code_tabs": "def add(a, b):\n\tif a:\n\t\treturn a + b\n    return b  # spaces\n",
    "whitespace_runs": "a  b   c    d\t\t e \u00a0 f     ",
    "newlines": "line one\n\nline two\r\nline three\n\n\n",
    "leading_space": "   leading spaces",
    "numbers": "12345 and 3.14159 and 2026",
    "number_with_leading_space": " 2026",
    "mixed_scripts": "English, русский, العربية, हिन्दी, ελληνικά, עברית, ไทย",
    "accents": "Café naïve façade jalapeño Ångström",
    "special_tokens_in_text": "<|im_start|>user\nhi<|im_end|>",
    "special_tokens_adjacent": "<|im_end|><|im_start|>assistant\n<|endoftext|>x",
    "partial_special_token": "<|im_start and <|im_end| are not special",
    "punctuation": "Hello!!! What?!... (nested [brackets] {braces}) — “quotes” ‘single’ ...",
}

# Numbers, including non-ASCII numerals, where pre-tokenizer digit handling shows.
NUMERALS = [" ²", " ½ cup", "x² + y²", "① ② ③", " ٣٤٥", "１２３ ４５", "³⁴", "version 1.2.3-rc4", "12345", " 2026"]
