"""Strings the tokenizer goldens cover: every script, whitespace pattern and special-looking
text a tokenizer tends to get wrong. Deterministic; kept in one place so the golden files
and the tests agree on what was checked."""

ASCII = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "a", "A", "I", "ab", "hello",
    "Hello", "HELLO", "hElLo WoRlD", "What's up?", "I'm fine, thanks.", "don't", "they'll", "we've",
    "she'd", "it's", "you're", "IT'S", "It'S", "O'Neil's", "rock 'n' roll", "'quoted'", '"double"',
    "semi;colon", "a,b,c", "end.", "...", "?!", "foo-bar_baz", "snake_case_name", "camelCaseName",
    "PascalCase", "SCREAMING_CASE", "e-mail", "user@example.com", "https://example.com/path?q=1&r=2#frag",
    "C:\\Windows\\System32", "/usr/local/bin", "#hashtag", "@mention", "$100", "50%", "a+b=c",
    "x*y/z", "(parens)", "[brackets]", "{braces}", "<angle>", "back`tick`", "tilde~", "caret^",
    "pipe|", "under_score", "hyphen-ated", "Mr. Smith went to Washington.", "U.S.A.", "e.g. i.e. etc.",
]
WHITESPACE = [
    " ", "  ", "   ", "    ", "     ", "          ", "\t", "\t\t", "\t\t\t", "\n", "\n\n", "\n\n\n",
    "\r\n", "\r\n\r\n", " \n", "\n ", " \t ", "\t \n", "a b", "a  b", "a   b", "a\tb", "a\nb",
    "a\n\nb", "a \n b", " leading", "trailing ", "  both  ", "\n\nleading newlines", "trailing newlines\n\n",
    "line one\nline two\nline three", "tab\tseparated\tvalues", "mixed \t\n whitespace", "  \n  \n  ",
    "word\u00a0nbsp", "thin\u2009space", "ideographic\u3000space", "zero\u200bwidth",
    "        eight spaces", "\t\tdef indented():", "para one.\n\npara two.\n\n\npara three.",
]
DIGITS = [
    "0", "1", "12", "123", "1234", "12345", "123456789", "3.14159", "2.718281828", "-42", "+7",
    "1,000,000", "1.000.000,50", "2024-01-15", "12:34:56", "3/4", "1e10", "6.02e23", "0x1F",
    "0b1010", "007", "v1.2.3", "ISO 8601", "Room 101", "42nd Street", "1st 2nd 3rd 4th",
    "phone: +1 (555) 123-4567", "٣٤٥", "१२३", "①②③", "Ⅻ", "½ cup", "x²+y²", "3 × 4 = 12",
]
ACCENTS = [
    "café", "naïve", "résumé", "Ångström", "Zürich", "São Paulo", "Ελληνικά", "Привет, мир!",
    "Dvořák", "Łódź", "Straße", "fiancée", "crème brûlée", "Tiếng Việt có dấu", "Ñandú",
    "İstanbul", "ÆØÅ æøå", "Ça va?", "El niño", "über", "e\u0301 combining", "a\u0308o\u0308u\u0308",
    "Москва", "Київ", "Español: ¿Cómo estás?", "Português: ação, coração", "Română: știință",
]
CJK = [
    "你好，世界！", "我爱编程。", "中文分词测试", "日本語のテキスト", "こんにちは", "カタカナ",
    "東京都渋谷区", "한국어", "안녕하세요", "漢字とかなの混在テキストです。", "中文 English 混合",
    "２０２４年", "ＡＢＣ全角", "「引用」", "『二重』", "〜波ダッシュ", "龍", "𠀋𡈽𡌛",
    "繁體中文", "简体中文", "Mixed 日本 and 中国 and 한국",
]
EMOJI = [
    "🎉", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "❤️", "🔥 fire", "emoji🚀inside", "✅ done",
    "🤖🧠💡", "⭐️⭐️⭐️", "🏳️‍🌈", "☕", "Smile :) :-( ;)", "🙏🏻 thanks", "a🎉b🎉c",
]
CODE = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n-1) + fibonacci(n-2)",
    "fn main() {\n    println!(\"Hello\");\n}",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "const x = async () => { await fetch('/api'); };",
    "SELECT id, name FROM users WHERE age > 21 ORDER BY name;",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "<html><body><p class=\"x\">Hi</p></body></html>",
    "import numpy as np\nx = np.zeros((3, 4))",
    "#include <stdio.h>\nint main(void) { return 0; }",
    "x = [i**2 for i in range(10) if i % 2 == 0]",
    "git commit -m \"fix: handle edge case\"",
    "$ ls -la | grep '.rs' > out.txt 2>&1",
    "    return self.value",
    "if (a && b || !c) { x >>= 2; y <<= 1; }",
    "let s: &str = \"raw\";",
    "```python\nprint('hi')\n```",
    "# Title\n\n## Subtitle\n\n- item 1\n- item 2\n\n**bold** _italic_",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "a -> b => c <= d != e == f",
    "__init__", "__name__ == '__main__'", "x_1, x_2, x_3",
]
SPECIAL_LOOKING = [
    "<|im_start|>", "<|im_end|>", "<|im_start|>user\nhello<|im_end|>", "<|endoftext|>",
    "<start_of_turn>", "<end_of_turn>", "<start_of_turn>user\nHi<end_of_turn>", "<bos>", "<eos>",
    "<s>", "</s>", "<unk>", "<pad>", "<0x0A>", "<0xFF>", "[INST]", "[/INST]", "<<SYS>>",
    "<|eot_id|>", "<|begin_of_text|>", "<mask>", "<|im_start", "im_start|>", "< |im_start| >",
    "<|im_start|><|im_end|>", "text<|im_end|>more", "<start_of_image>", "<unused0>", "[multimodal]",
    "<html>", "<b>bold</b>", "<h1>Title</h1>",
]
OTHER_SCRIPTS = [
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "ሰላም", "Γειά σου", "Բարեւ",
    "გამარჯობა", "ᚠᚢᚦᚨᚱᚲ", "ꦲꦏ꧀ꦱꦫ", "ⵜⴰⵎⴰⵣⵉⵖⵜ", "ᐊᐃᐅ", "∀x∈ℝ: x²≥0", "∑∫∂∇√∞≠≈", "→←↑↓⇒⇔",
    "©®™", "§¶†‡", "€£¥₹₿", "°C °F", "µs", "Ω", "™ trademark", "\u00ad soft hyphen", "\ufeffBOM",
]
LONGER = [
    "The Industrial Revolution, which began in Britain in the late 18th century, transformed economies "
    "that had been based on agriculture and handicrafts into economies based on large-scale industry, "
    "mechanized manufacturing, and the factory system.",
    "Photosynthesis converts light energy into chemical energy: 6CO2 + 6H2O → C6H12O6 + 6O2.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong's words were \"That's one small step for "
    "[a] man, one giant leap for mankind.\"",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abababababababababababab", "!!!!!!!!!!!!!!!!", "..........",
    "----------------------------------------", "================", "________________", "0000000000000000",
    "The year 2024 had 366 days; 2023 had 365.", "Q: What is 17 * 23?\nA: 391",
]

def corpus():
    seen, out = set(), []
    for group in (ASCII, WHITESPACE, DIGITS, ACCENTS, CJK, EMOJI, CODE, SPECIAL_LOOKING, OTHER_SCRIPTS, LONGER):
        for s in group:
            if s not in seen:
                seen.add(s)
                out.append(s)
    # Pairwise joins exercise boundaries between categories.
    base = list(out)
    for i in range(0, len(base) - 1, 7):
        s = base[i] + base[i + 1]
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out

if __name__ == "__main__":
    print(len(corpus()))
