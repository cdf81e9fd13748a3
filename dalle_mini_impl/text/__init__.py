"""The text tokenizer: captions <-> fixed-length id rows (sentencepiece BPE with byte fallback).

    tokenizer.py  `TextTokenizer`: train, encode (bos, caption, eos, pads), decode, save and load
"""
