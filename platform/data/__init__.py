"""genrec.data"""
