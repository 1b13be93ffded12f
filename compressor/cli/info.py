"""placeholder: replaced by the info command module"""
