"""The frozen GPT-OSS teacher: snapshot resolution, EasyDeL loading and fixes, the tiny-teacher recipe."""
