"""What is built on the library, not part of it: the demo, the fine-tuning benchmark and its data,
the method names the studies compare, and the privacy audit. The library core never imports them."""
