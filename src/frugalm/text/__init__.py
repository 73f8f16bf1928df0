"""Text in: reading text files as streams, encoding documents, seeded noise, YAML from users, near-duplicate removal."""
