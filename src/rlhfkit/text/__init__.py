"""Text tools shared by evaluation, retrieval, rewards and SFT: normalisation and fact checking (`facts`), sentence
embeddings and their similarity (`embedding`), ROUGE-L (`rouge`)."""
