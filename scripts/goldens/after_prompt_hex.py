"""Prints, in hex, what a llama-simple output file holds after the echoed prompt (less the
final newline)."""
import sys

data = open(sys.argv[1], "rb").read()
prompt = sys.argv[2].encode()
at = data.find(prompt)
if at < 0:
    sys.exit("the prompt is not in the output")
print(data[at + len(prompt):].rstrip(b"\n").hex())
