// Shim for the CUDA emulator (see ../emu.h).
#pragma once
#include "../emu.h"
