// (file being written in this session)
