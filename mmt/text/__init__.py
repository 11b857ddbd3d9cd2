"""Text tokenisation shared by the data pipeline and the text encoder."""

from mmt.text.tokenizer import ByteTokenizer, JsonTokenizer, Tokenizer, build_tokenizer

__all__ = ["ByteTokenizer", "JsonTokenizer", "Tokenizer", "build_tokenizer"]
