"""Offline preprocessing: decode, rescale, centre-crop and pack images into LMDB shards (paper Sec. 2)."""
