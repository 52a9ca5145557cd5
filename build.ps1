#!/usr/bin/env pwsh
#Requires -Version 7
# KvKernels front door for PowerShell 7: the same verbs as build.sh (./build.ps1 help lists them).
param(
    [Parameter(Position = 0)][string]$Verb = 'help',
    [Parameter(ValueFromRemainingArguments)][string[]]$Rest
)

$ErrorActionPreference = 'Stop'
$PSNativeCommandUseErrorActionPreference = $false   # native exit codes are checked by hand below
Set-StrictMode -Version Latest
Set-Location -LiteralPath $PSScriptRoot
if ($null -eq $Rest) { $Rest = @() }

$Config = 'Release'
$Tfm = 'net10.0'
$Solution = 'Kernels.sln'
$KvCheckDll = "tools/KvCheck/bin/$Config/$Tfm/KvCheck.dll"
$LibraryProject = 'src/KvKernels/KvKernels.csproj'
$TestResults = 'artifacts/test-results'
$PackagesDir = 'artifacts/packages'
$NvrtcCacheLib = '.cache/nvrtc/lib/libnvrtc.so.12'

$env:DOTNET_CLI_TELEMETRY_OPTOUT = '1'
$env:DOTNET_NOLOGO = '1'
$env:DOTNET_SKIP_FIRST_TIME_EXPERIENCE = '1'

function Show-Usage {
    @'
Usage: ./build.ps1 <verb> [args...]

Verbs:
  run       the main job: KvCheck verify (every op, CPU and GPU, compared), KvCheck compile, KvCheck bench --quick
  test      the whole test suite, as CI runs it (NVRTC required); results in artifacts/test-results/
  bench     KvCheck bench
  compile   KvCheck compile: every shipped kernel through NVRTC, registers and spills
  pack      NuGet package of src/KvKernels into artifacts/packages/

Extra arguments pass through to KvCheck (./build.ps1 compile --json out.json --arch sm_90),
to each test assembly for test (xunit v3 runner options: -class NAME, -method NAME, ...),
and to dotnet pack for pack. run takes none. Put -- before arguments that PowerShell would take
for its own (-Debug, -Verbose, ...): ./build.ps1 test -- -debug
On Linux NVRTC is fetched into .cache/nvrtc/ first when the machine has none (tools/fetch-nvrtc.sh);
on Windows install NVRTC with the CUDA toolkit (or set KVKERNELS_NVRTC to nvrtc64_*.dll).
'@ | Write-Host
}

function Stop-Build([string]$Message, [int]$Code = 1) {
    [Console]::Error.WriteLine("build.ps1: $Message")
    exit $Code
}

# tools/fetch-nvrtc.sh is silent when NVRTC is already there. A failed fetch is a warning, not an
# error: the CPU paths still work, and tests that need NVRTC report why it is missing.
function Initialize-Nvrtc {
    if ($IsLinux) {
        & bash tools/fetch-nvrtc.sh --quiet
        if ($LASTEXITCODE -ne 0) {
            Write-Warning 'NVRTC could not be fetched; work that needs it will report NVRTC unavailable.'
        }
        if (-not $env:KVKERNELS_NVRTC -and (Test-Path -LiteralPath $NvrtcCacheLib)) {
            $env:KVKERNELS_NVRTC = Join-Path $PWD.Path $NvrtcCacheLib
        }
    }
    else {
        Write-Host 'build.ps1: NVRTC is not fetched on this OS; install it with the CUDA toolkit (or set KVKERNELS_NVRTC).'
    }
}

function Invoke-SolutionBuild {
    Write-Host "build.ps1: dotnet build $Solution -c $Config"
    # 'Continue' so that redirected stderr lines do not stop the script before the exit code is read.
    $ErrorActionPreference = 'Continue'
    $output = & dotnet build $Solution -c $Config -nologo -v q 2>&1
    $rc = $LASTEXITCODE
    $ErrorActionPreference = 'Stop'
    if ($rc -ne 0) {
        $output | ForEach-Object { [Console]::Error.WriteLine("$_") }
        Stop-Build "build FAILED (dotnet build $Solution -c $Config)"
    }
}

function Invoke-KvCheck([string[]]$Arguments) {
    if (-not (Test-Path -LiteralPath $KvCheckDll -PathType Leaf)) {
        Stop-Build "$KvCheckDll not found after the build (is tools/KvCheck in $Solution?)"
    }
    & dotnet $KvCheckDll @Arguments
    $script:ExitCode = $LASTEXITCODE
}

# Functions that run native commands leave their exit code in $script:ExitCode and return nothing,
# so that the commands' output goes to the console rather than into a return value.
$script:ExitCode = 0

# "total N, passed N, failed N, skipped N, errors N" from a test assembly's xunit v3 XML.
function Get-XmlCounts([string]$Path) {
    try {
        $assembly = ([xml](Get-Content -LiteralPath $Path -Raw)).assemblies.assembly | Select-Object -First 1
        if ($null -eq $assembly) { return "no <assembly> element in $Path" }
        return ('total', 'passed', 'failed', 'skipped', 'errors' | ForEach-Object { "$_ $($assembly.GetAttribute($_))" }) -join ', '
    }
    catch {
        return "unreadable results file $Path"
    }
}

function Invoke-Run {
    if ($Rest.Count -gt 0) {
        Stop-Build "run takes no arguments (got: $($Rest -join ' ')); use ./build.ps1 bench ... or dotnet $KvCheckDll ..."
    }
    Initialize-Nvrtc
    Invoke-SolutionBuild
    Invoke-KvCheck @('verify')
    if ($script:ExitCode -ne 0) {
        [Console]::Error.WriteLine("build.ps1: KvCheck verify FAILED (exit $script:ExitCode); compile and bench skipped.")
        return
    }
    # Every shipped kernel through NVRTC (registers, spills); exit 2 means no NVRTC here: say so and go on.
    Invoke-KvCheck @('compile')
    if ($script:ExitCode -eq 2) {
        [Console]::Error.WriteLine("build.ps1: warning: NVRTC unavailable, kernels not compiled.")
        $script:ExitCode = 0
    }
    elseif ($script:ExitCode -ne 0) {
        [Console]::Error.WriteLine("build.ps1: KvCheck compile FAILED (exit $script:ExitCode); bench skipped.")
        return
    }
    Invoke-KvCheck @('bench', '--quick')
}

function Invoke-Test {
    $env:KVKERNELS_REQUIRE_NVRTC = '1'
    Initialize-Nvrtc
    Invoke-SolutionBuild
    New-Item -ItemType Directory -Force -Path $TestResults | Out-Null
    Remove-Item -Path "$TestResults/*.xml" -Force -ErrorAction SilentlyContinue

    # Colour codes only on a terminal, not in CI logs.
    $runnerArgs = @()
    if ([Console]::IsOutputRedirected) { $runnerArgs += '-noColor' }

    $failed = 0
    $summary = @()
    $projects = @(Get-ChildItem -Path 'tests/*/*.csproj' -File | Where-Object { $_.BaseName -eq $_.Directory.Name })
    if ($projects.Count -eq 0) { Stop-Build 'no test projects under tests/' }
    foreach ($project in $projects) {
        $name = $project.BaseName
        $dll = "tests/$name/bin/$Config/$Tfm/$name.dll"
        $xml = "$TestResults/$name.xml"
        if (-not (Test-Path -LiteralPath $dll -PathType Leaf)) {
            [Console]::Error.WriteLine("build.ps1: $dll not found after the build (is tests/$name/$name.csproj in $Solution?)")
            $summary += "${name}: FAILED (no test assembly at $dll)"
            $failed = 1
            continue
        }
        Write-Host "build.ps1: dotnet $dll -xml $xml $(($runnerArgs + $Rest) -join ' ')"
        & dotnet $dll -xml (Join-Path $PWD.Path $xml) @runnerArgs @Rest
        $rc = $LASTEXITCODE
        $state = if ($rc -eq 0) { 'ok' } else { "FAILED (exit $rc)" }
        $counts = if (Test-Path -LiteralPath $xml) { Get-XmlCounts $xml } else { 'no results file' }
        $summary += "${name}: $state - $counts"
        if ($rc -ne 0) { $failed = 1 }
    }

    Write-Host ''
    Write-Host 'Test summary:'
    $summary | ForEach-Object { Write-Host "  $_" }
    $script:ExitCode = $failed
}

function Invoke-Bench {
    Initialize-Nvrtc
    Invoke-SolutionBuild
    Invoke-KvCheck (@('bench') + $Rest)
}

function Invoke-Compile {
    Initialize-Nvrtc
    Invoke-SolutionBuild
    Invoke-KvCheck (@('compile') + $Rest)
}

function Invoke-Pack {
    Write-Host "build.ps1: dotnet pack $LibraryProject -c $Config -o $PackagesDir"
    & dotnet pack $LibraryProject -c $Config -o $PackagesDir -nologo @Rest
    $script:ExitCode = $LASTEXITCODE
}

switch ($Verb) {
    'run' { Invoke-Run }
    'test' { Invoke-Test }
    'bench' { Invoke-Bench }
    'compile' { Invoke-Compile }
    'pack' { Invoke-Pack }
    { $_ -in '-h', '--help', 'help' } { Show-Usage }
    default {
        [Console]::Error.WriteLine("build.ps1: unknown verb '$Verb'")
        Show-Usage
        $script:ExitCode = 2
    }
}
exit $script:ExitCode
