"""Data: raw record formats and their validation, chat templates, splitting, tokenised splits and batches."""
