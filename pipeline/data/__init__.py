"""Data: the SPair-71k layout read into pairs and images tables (`spair`), dataset archives fetched and
unpacked (`download`), and image files read and written (`images`)."""
