"""A tiny GPT, written from scratch, with the public interface of Karpathy's minGPT."""
