"""Data: the SPair-71k layout read into pairs and images tables (`spair`), dataset archives fetched and
unpacked (`download`), image files read and written (`images`), and the predictions table's schema, which
matching writes and evaluation reads (`predictions`)."""
