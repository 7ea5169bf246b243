"""Data preparation: public chest X-ray archives to training shards."""
